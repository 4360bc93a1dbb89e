"""Checkpoint files: reading them safely, writing them atomically, and the weight files a model starts from.

- `read`: weight files read from disk, with errors that name the file.
- `safety`: pickles that could run code are refused before anything unpickles them.
- `safe_load`: DEIM's layer classes on the allow-list of Ultralytics' restricted unpickler.
- `atomic`: checkpoints written so that a killed process never leaves a truncated file.
- `backbone`: the authors' ImageNet-pretrained HGNetv2 backbone files, for `pretrained=True`.
- `zoo`: the authors' released detectors by name (`DEIM("deim-s.pt")`): download, convert, cache.
"""
