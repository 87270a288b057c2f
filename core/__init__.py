"""The machinery train.py and predict.py run on, one module per question a forker arrives with
(README.md's map lists them). The user files never import it, and it never imports train, modeling
or dataset; no module of it imports one that imports it."""
