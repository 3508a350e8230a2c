/* Pin the OpenMP worker threads of the calling thread's team to one CPU each, as vLLM's CPU worker does:
 * the OpenMP runtime is the one torch loaded (same soname), so the GEMMs' and these kernels' workers stop
 * migrating between cores. Thread 0 (the caller) is pinned only when pin_master is set: a pinned caller
 * would pass its one-CPU mask on to every process it starts later. Returns how many threads were pinned. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>

int omp_get_thread_num(void);

int accel_bind_threads(const int *cpus, int n, int pin_master) {
    int pinned = 0;
#pragma omp parallel num_threads(n) reduction(+ : pinned)
    {
        const int t = omp_get_thread_num();
        if (t > 0 || pin_master) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus[t], &set);
            pinned += pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
        }
    }
    return pinned;
}
