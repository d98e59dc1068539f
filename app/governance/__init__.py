"""Governance: the figures Corral watches (metrics), rules over them that beat evaluates,
alerts with a lifecycle, the actions that keep the platform healthy, and system health."""
