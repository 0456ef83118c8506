"""Real test infrastructure (an S3 server, a fault-injecting proxy) shared by the test modules."""
