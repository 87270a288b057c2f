"""The machinery train.py and predict.py run on: options, checkpoints, the refusals before a run,
the checks of the user files, samplers and the run's surroundings. The user files never import it,
and it never imports train, modeling or dataset."""
