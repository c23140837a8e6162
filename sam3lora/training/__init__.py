"""Training: the LightningModule, its callbacks and the Hydra app that wires built objects together."""
