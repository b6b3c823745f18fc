"""The parts of ``megatron_coord.TrainingInference`` (training_inference.py): serving a training
script's own model from background threads of the script's processes.

``layout``: the serving process groups and the checks of the script's world and model;
``serving_thread``: each rank's EngineServer loop, and parking it; ``client_thread``: each
rank's InferenceClient on an asyncio loop of its own.
"""
