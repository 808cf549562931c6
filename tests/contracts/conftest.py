from tests.chain_fixtures import *  # noqa: F403 (fixtures: anvil_url, anvil_w3, embedded_w3, w3, sync_anvil_w3)
