"""The throwaway pure cgroup-v2 QEMU guest that runs tests/guest_tests: see vm.py."""
