"""asc-dist: distributed acoustic scene classification (Ye et al.'s recipe and the DCASE 2024 one).

One job per module, imports pointing one way (README.md, "Layout"):

    errors, config, atomic, cli          what every layer may use
    audio, frontend                      audio in/out; the torch log-mel front end
    data/                                shards -> batches (DALI, torch, the feature cache)
    model, losses, mixup, augment, optim the recipe's parts; complexity: params/MACs as DCASE counts
    dist, checkpoint, runlock, progress, tracking, validate, plots, train    training
    distill                              teacher logits once per split; the distillation loss
    restore, evaluate, predict, export   inference from a checkpoint
    pack/, synth, scenes, features       preparing and inspecting data
    torchrun, table1/, bench/            launching, experiments, benchmarks
"""

__version__ = "0.1.0"
