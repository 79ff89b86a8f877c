"""The throwaway pure cgroup-v2 QEMU guest that runs tests/guest/inside: see vm.py."""
