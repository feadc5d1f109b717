"""The gpuq manager: rents and destroys instances by queue depth, idle time, prices, budgets and hours."""
