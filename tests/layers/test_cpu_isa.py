"""ATEN_CPU_CAPABILITY narrows what inferd uses, the same way it narrows torch."""

from __future__ import annotations

import pytest

from inferd.layers import cpu_isa

AVX512_BF16 = frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})
AVX2_ONLY = frozenset({"avx2", "fma"})


@pytest.fixture
def cpu(monkeypatch):
    def set_cpu(flags, forced=None):
        monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags)
        if forced is None:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        else:
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", forced)
    return set_cpu


def test_an_avx512_bf16_cpu_uses_bf16_and_native_kernels(cpu):
    cpu(AVX512_BF16)
    assert cpu_isa.has_native_bf16() and cpu_isa.kernel_march() == "-march=native"


def test_forcing_avx2_on_an_avx512_cpu_behaves_like_an_avx2_cpu(cpu):
    cpu(AVX512_BF16, forced="AVX2")
    assert not cpu_isa.avx512_allowed() and not cpu_isa.has_native_bf16()
    assert cpu_isa.kernel_march() == "-march=x86-64-v3"
    cpu(AVX512_BF16, forced="avx512")
    assert cpu_isa.has_native_bf16()


def test_an_avx2_cpu_has_no_bf16_whatever_is_asked(cpu):
    cpu(AVX2_ONLY)
    assert not cpu_isa.has_native_bf16()
    cpu(AVX2_ONLY, forced="avx512")
    assert not cpu_isa.has_native_bf16()


def test_the_real_flags_are_read(cpu):
    flags = cpu_isa.cpu_flags()
    assert isinstance(flags, frozenset)
    assert not flags or "fpu" in flags  # every x86-64 CPU lists the FPU
