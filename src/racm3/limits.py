"""What one generation or search request may ask, shared by the CLI and the server.

Kept free of heavy imports, so `racm3 --help` stays instant.
"""

MAX_SAMPLES = 64  # samples per CLI call: each is a full decode; 64 x 64 codes fit in memory and finish in minutes
MAX_GUIDANCE = 100.0  # far above useful scales (1-5); larger ones overflow the guided log-probabilities
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # besides 0 (greedy): outside, the scaled logits overflow
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
MAX_SEARCH_K = 1000  # documents per search: each hit is fetched and decoded; more is a dump, not a search
TEMPERATURE_RULE = f"0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}"


def temperature_ok(value: float) -> bool:
    """The sampling temperatures a request may ask: TEMPERATURE_RULE."""
    return value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE
