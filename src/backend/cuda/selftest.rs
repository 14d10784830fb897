pub fn run_selftest() {}
