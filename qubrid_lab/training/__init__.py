"""LoRA fine-tuning: hyperparameters, the training loop and the job worker process."""
