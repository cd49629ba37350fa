"""Operations of the RWKV-7 layer. Each module holds the torch reference of one operation
and the public function that picks a backend; the math is in ops/README.md."""
