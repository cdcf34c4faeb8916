"""Training: run config, negative sampling, full-ranking metrics, the loop, saved runs, DeepSpeed.

``config`` (RunConfig, load_config) <- ``sampler``, ``metrics`` <- ``loop`` (Trainer) <- ``run``
(save_run, load_run) and ``distributed`` (DeepSpeedTrainer). MLflow tracking sits above, in
:mod:`dprec.tracking`; details and measured numbers in docs/training-and-registry.md.
"""
