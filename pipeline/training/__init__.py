"""Training: the teacher, distillation (FACD and its baselines), the losses, the shipped teachers, the study."""
