"""How setup.py builds the compiled op (owned by the matcher work; see csrc/)."""


def extensions():
    return []


def build_ext_cmdclass():
    return {}
