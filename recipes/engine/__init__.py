"""The training engine. A run is built by :func:`.trainer.build_run`, each stage opened by
:func:`.trainer.open_stage` and trained by :func:`.trainer.train_stage`; :func:`.trainer.train` reads
top to bottom over them, and ``effnetv2 bench`` drives the same parts."""
