"""Scenario files: typed schema, loader with located errors, overrides."""

from fedflat.scenario.loader import LoadedScenario, dump_scenario, load_scenario
from fedflat.scenario.schema import Scenario

__all__ = ["LoadedScenario", "Scenario", "dump_scenario", "load_scenario"]
