"""Training jobs fed by the pipeline's export: face recognition and face enhancement, on Ray Train.

Entry points (plain functions the CLI calls; nothing heavy is imported here):

- ``training.recognition.train_recognition(RecognitionTrainConfig) -> TrainResult``
- ``training.enhancement.train_enhancement(EnhancementTrainConfig) -> TrainResult``
- ``training.verification.evaluate_verification(VerificationEvalConfig) -> dict``
- ``training.config.load_train_config(path_or_dict, ConfigModel)``
"""
