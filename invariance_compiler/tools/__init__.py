"""What is not a step of the compiler but uses it (DESIGN §1): the demo and profile commands, the
model zoo and the small transformers models that the tests, benchmarks and examples share."""
