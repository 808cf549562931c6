"""The test toolkit: one of each thing the tests need, registered as a pytest plugin
(``tests.support.plugin``, named in tests/conftest.py).

- :mod:`.poll`: waiting for a condition (``until``, awaited; ``wait``, blocking).
- :mod:`.ports`: free loopback ports (one, or a block for ``launcher.plan()``).
- :mod:`.anvil`: a real anvil node (the ``anvil_url`` fixture and the benches use it).
- :mod:`.bus`: a hub on loopback with CURVE keys (``Grid``), publishing each event as its
  proper source (``Sources``) and a probe that records what it hears (``BusProbe``).
- :mod:`.plan`: the processes of ``launcher.plan()`` as a test sees them (``PlanGrid``).
- :mod:`.signing`: signed offers, bids and meter facts, as the sites make them.

The modules import nothing from test modules, so the benches may use them too.
"""
