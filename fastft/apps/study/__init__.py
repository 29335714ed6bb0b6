"""`fastft study`: every fine-tuning method on six real classification tasks, accuracy beside cost."""
