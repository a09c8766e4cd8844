"""Training for the four stages.

    data.py    data sources: the Shapes domain, captioned image folders, WebDataset tar shards
    stages.py  each stage's objective, fed exactly what its inference engine feeds the model
    loop.py    AdamW, EMA, autocast, checkpoints and exact resumption
    cli.py     `unclip train`

Nothing is imported here, so that `unclip --help` stays free of torch.
"""
