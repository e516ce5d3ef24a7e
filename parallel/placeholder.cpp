// placeholder until the parallel module lands
