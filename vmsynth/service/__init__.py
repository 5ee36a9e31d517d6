"""The cloudlet side: `vmsynth serve` (cloudlet.py, http.py) and its client (client.py).

The engine drives it as a library: the CLI only parses options and starts it; the service
never shells out to the vmsynth command.
"""
