/* C11 __atomic builtins for the ring's head/tail protocol (GCC and Clang, x86-64 and aarch64).
 *
 * The producer writes a frame, then publishes head with release; the consumer loads head with
 * acquire, then reads the frame. The same pair runs the other way on tail. The sleep/wake
 * handshake ("I am about to sleep" flag against "I just published") is a Dekker pattern and
 * needs full fences on both sides: fq_fence.
 */
#ifndef FASTQ_ATOMIC_H
#define FASTQ_ATOMIC_H

#include <stdint.h>

static inline uint64_t fq_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t fq_load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void fq_store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fq_store_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t fq_exchange(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline void fq_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Ask for a cache line the consumer reads soon: it was last written on the producer's core. */
static inline void fq_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
/* Ask for ownership of a line the producer writes soon: the consumer's core read it last. */
static inline void fq_prefetch_write(void *p) { __builtin_prefetch(p, 1, 3); }

/* A polite spin: lets the sibling hyperthread run and saves power while waiting. */
static inline void fq_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
