"""The in-process TP=1 context of the model tests, for the layer tests here."""

from tests.model.conftest import ctx1  # noqa: F401  (a fixture, found by name)
