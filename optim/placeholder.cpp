// placeholder until the optim module lands
