"""lm-eval ``custom_dataset`` for the tasks in this folder: reads the JSONL file a task's
YAML names (``dataset_kwargs: {file: ...}``) from beside this file, whatever the working
directory. Written by training/evaldata.py."""

from pathlib import Path


def load(file, **_):
    import datasets
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).resolve().parent / file)})
