"""The machine-learning work, with no queue and no database: data, models, fine-tuning, evaluation,
calibration, scoring and prediction.
"""
