"""Pure array algorithms (numpy/torch only, no Ray, no I/O), each testable against brute force."""
