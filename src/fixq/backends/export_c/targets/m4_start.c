/* fixq: vector table and reset for a bare-metal Cortex-M4 (QEMU mps2-an386). newlib's
 * rdimon crt0 (_start) zeroes .bss, gets argv by semihosting and calls main. SysTick counts
 * the core clock: under qemu -icount shift=0 one tick is 40 executed instructions (25 MHz
 * against 1 ns per instruction). */
#include <stdint.h>
extern void _start(void);
extern uint32_t __stack;
void fixq_reset(void);
static void fixq_fault(void) {
    for (;;) {
    }
}
static volatile uint32_t systick_wraps;
static void fixq_systick(void) {
    systick_wraps++;
}
__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(&__stack), fixq_reset, fixq_fault, fixq_fault, fixq_fault, fixq_fault, fixq_fault,
    0, 0, 0, 0, fixq_fault, fixq_fault, 0, fixq_fault, fixq_systick};

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

void fixq_reset(void) {
    SYST_RVR = 0x00FFFFFFu;
    SYST_CVR = 0u;
    SYST_CSR = 7u; /* processor clock, interrupt on wrap, enabled */
    _start();
    for (;;) {
    }
}

/* core clock ticks since reset */
uint64_t fixq_ticks(void) {
    uint32_t w, v;
    do {
        w = systick_wraps;
        v = SYST_CVR;
    } while (w != systick_wraps);
    return (uint64_t)w * 0x01000000u + (0x00FFFFFFu - v);
}
