from setuptools import setup

setup(
    name="vtunnel",
    version="0.1.0",
    description="A TCP tunnel over VM sockets (AF_VSOCK, Hyper-V sockets), wire-compatible with the Go vtunnel",
    py_modules=["vtunnel", "vtunnel_metrics", "vtunnel_mirror", "vtunnel_npipe", "vtunnel_trust"],
    python_requires=">=3.10",
    # The pump waits with three gevent internals (vtunnel.wait_ready): the range is what tox's
    # gevent-oldest and gevent-newest environments test.
    install_requires=["gevent>=23.9,<27", "pyyaml>=6.0", "docopt-ng>=0.9", "prometheus_client>=0.17"],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6"]},
    entry_points={"console_scripts": ["vtunnel = vtunnel:main_exit"]},
)
