"""The ``effnetv2`` command line: :mod:`.main` dispatches to one module per command, each exposing
``add_arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported."""
