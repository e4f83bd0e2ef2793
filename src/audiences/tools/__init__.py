"""Users of the engine — benchmark, demo, tail, the shop simulation. The engine never imports them."""
