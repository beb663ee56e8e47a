"""The network (docs/DESIGN.md sections 3-7): array math and flax modules, no I/O.

layers → state → attention → ring → sublayer → transformer → layout, params.
"""
