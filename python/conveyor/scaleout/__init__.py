"""Adapters that run Conveyor on other engines (KServe, Ray); the engine never imports them."""
