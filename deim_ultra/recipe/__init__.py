"""DEIM's training recipe: the authors' per-size numbers (`tables`), the schedule as pure functions (`schedule`),
Ultralytics settings under a recipe (`settings`), AdamW parameter groups (`optim`) and the no-aug tail's restart
(`tail_restart`). The trainer (`deim_ultra.train`) calls into these.
"""
