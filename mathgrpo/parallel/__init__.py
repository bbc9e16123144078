"""The device mesh, logical-axis rules, shardings and multi-host initialization."""
