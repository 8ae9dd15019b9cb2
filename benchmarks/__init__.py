"""The project's benchmarks: each module measures one thing against a baseline measured in the same run.

Run one from the repository root as ``python -m benchmarks.NAME [--help]``; each prints its figures
as JSON lines (:func:`benchmarks.common.emit`, stamped with date, commit and machine). Child
processes start through :func:`benchmarks.children.run_children` only. ``README.md`` beside this
file says what each benchmark measures; ``python -m benchmarks.tables`` renders the recorded
lines of ``results/`` into ``docs/benchmark-results.md``.

Not part of the installed ``imgx3d`` package: benchmarks import ``imgx3d``, never the reverse.
"""
