"""Classic BPF programs attached to sockets: the instruction encoding and the setsockopt.

Owns: the few opcodes our two programs use (reuseport steering in receive.reuseport, the kernel
ban filter in receive.kernelban) and packing a program into a `struct sock_fprog`. Must not:
decide what a program does.

Why classic BPF: a handful of instructions, no compiler, no privileges beyond owning the socket.
"""

from __future__ import annotations

import ctypes
import socket
import struct

Instruction = tuple[int, int, int, int]  # (code, jt, jf, k), struct sock_filter

SO_ATTACH_FILTER = 26  # include/uapi/asm-generic/socket.h
SO_DETACH_FILTER = 27
SO_ATTACH_REUSEPORT_CBPF = 51
BPF_MAXINSNS = 4096  # include/uapi/linux/bpf_common.h
SKF_NET_OFF = -0x100000  # linux/filter.h: offsets relative to the network header

LD_W_ABS = 0x20  # A = 32-bit word at k
ALU_AND_K = 0x54  # A &= k
ALU_MOD_K = 0x94  # A %= k
JEQ_K = 0x15  # pc += (A == k) ? jt : jf
TAX = 0x07  # X = A
TXA = 0x87  # A = X
RET_K = 0x06  # return k
RET_A = 0x16  # return A


def load_net_word(offset: int) -> Instruction:
    """A = the 32-bit word at `offset` octets into the packet's network (IP) header."""
    return (LD_W_ABS, 0, 0, (SKF_NET_OFF + offset) & 0xFFFFFFFF)


def attach(sock: socket.socket, option: int, code: list[Instruction]) -> None:
    """setsockopt(SOL_SOCKET, option, program); the kernel copies it. Raises OSError."""
    filters = (ctypes.c_uint8 * (8 * len(code))).from_buffer_copy(
        b"".join(struct.pack("=HBBI", *ins) for ins in code)
    )
    fprog = struct.pack("HL", len(code), ctypes.addressof(filters))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)
