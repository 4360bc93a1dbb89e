"""DEIM's training recipe: the authors' per-size numbers (`tables`), the schedule as pure functions (`schedule`),
Ultralytics settings under a recipe (`settings`), AdamW parameter groups (`optim`), the no-aug tail's restart
(`tail_restart`) and the per-epoch / per-iteration callbacks that drive them (`hooks`). The trainer
(`deim_ultra.train`) calls into these.
"""
