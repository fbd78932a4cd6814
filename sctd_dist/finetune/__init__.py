"""Downstream evaluation: fine-tune a pretrained model on GLUE, SQuAD, local files or the
offline suite (`python -m sctd_dist.finetune`, see `cli.py`)."""
