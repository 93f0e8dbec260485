"""imsd benchmarks: ``python -m bench`` (``make bench``). Every figure is printed beside a
baseline measured in the same run, on the same machine, against the fake IMS on loopback."""
