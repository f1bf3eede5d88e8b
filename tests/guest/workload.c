/*
 * kvm-borg test guest workload.
 *
 * Appends fixed-size, sequence-numbered, CRC-protected records to a file
 * (default /data/records.log) and fsync()s after every record, so that the
 * file on the disk image is always a gap-free prefix 0..n-1 (plus at most one
 * torn record after a hard power-off).  Progress goes to stdout (the serial
 * console): "KBSEQ <n>" after record n is durable, "KBERR <text>" on any I/O
 * error (then it keeps retrying the same record).
 *
 * Record layout (64 bytes, little endian), mirrored in build.py:
 *   0  char[4]  magic "KBR1"
 *   4  u32      record size (64)
 *   8  u64      seq
 *   16 u64      guest CLOCK_REALTIME in ns
 *   24 u8[36]   payload, byte i = (seq * 31 + i) & 0xff
 *   60 u32      CRC-32 (zlib polynomial) of bytes 0..59
 *
 * On start it resumes after the last valid record already in the file
 * (truncating a torn tail), so a restored disk can be booted again.
 *
 * Progress lines carry the guest CLOCK_MONOTONIC in microseconds, taken right
 * after fsync() returned: "KBSEQ <n> <mono_us>".  The gap between two lines is
 * how long the guest waited for its disk (plus interval_ms).
 *
 * Invoked as "fsfreeze-hook" (qemu-ga -F runs it with "freeze" before
 * FIFREEZE and "thaw" after FITHAW) it prints "KBHOOK <arg> <mono_us>" to
 * /dev/console and exits 0 (a failing hook would make the freeze fail).
 * If /run/kb-hook-sleep-<arg> exists, it first sleeps that many milliseconds
 * (a test writes the file through the agent to simulate a slow or hung hook).
 *
 * Usage: workload [path] [interval_ms] [print_every]
 *        fsfreeze-hook freeze|thaw
 * Built with: gcc -static -O2 -o workload workload.c
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE 64
#define PAYLOAD_OFF 24
#define CRC_OFF 60

static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* One write(2) per line so lines are not split between writers. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    ssize_t r = write(1, buf, (size_t)n);
    (void)r;
}

static unsigned long long mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000ull;
}

/* qemu-ga fsfreeze hook: optional sleep, one console line, always exit 0. */
static int hook_main(int argc, char **argv) {
    const char *action = argc > 1 ? argv[1] : "?";
    char buf[128];
    snprintf(buf, sizeof buf, "/run/kb-hook-sleep-%s", action);
    FILE *f = strchr(action, '/') ? NULL : fopen(buf, "r");
    if (f) {
        long ms = 0;
        if (fscanf(f, "%ld", &ms) == 1 && ms > 0) {
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
        }
        fclose(f);
    }
    unsigned long long now = mono_us();
    int n = snprintf(buf, sizeof buf, "KBHOOK %s %llu\n", action, now);
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0 && n > 0) {
        ssize_t r = write(fd, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
        (void)r;
        close(fd);
    }
    return 0;
}

static void make_record(unsigned char *r, uint64_t seq) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    memcpy(r, "KBR1", 4);
    put_u32(r + 4, REC_SIZE);
    put_u64(r + 8, seq);
    put_u64(r + 16, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
    for (int i = 0; i < CRC_OFF - PAYLOAD_OFF; i++)
        r[PAYLOAD_OFF + i] = (unsigned char)((seq * 31 + (uint64_t)i) & 0xff);
    put_u32(r + CRC_OFF, crc32(r, CRC_OFF));
}

static int record_valid(const unsigned char *r, uint64_t seq) {
    return memcmp(r, "KBR1", 4) == 0 && get_u32(r + 4) == REC_SIZE &&
           get_u64(r + 8) == seq && get_u32(r + CRC_OFF) == crc32(r, CRC_OFF);
}

/* Number of valid records at the start of the file; truncates anything after. */
static uint64_t resume_point(int fd) {
    unsigned char r[REC_SIZE];
    uint64_t n = 0;
    while (pread(fd, r, REC_SIZE, (off_t)(n * REC_SIZE)) == REC_SIZE && record_valid(r, n))
        n++;
    struct stat st;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size != n * REC_SIZE) {
        say("KBTRUNC %llu -> %llu\n", (unsigned long long)st.st_size,
            (unsigned long long)(n * REC_SIZE));
        if (ftruncate(fd, (off_t)(n * REC_SIZE)) != 0)
            say("KBERR ftruncate: %s\n", strerror(errno));
    }
    return n;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR && !stop) {}
}

int main(int argc, char **argv) {
    const char *base = strrchr(argv[0], '/');
    if (strcmp(base ? base + 1 : argv[0], "fsfreeze-hook") == 0)
        return hook_main(argc, argv);

    const char *path = argc > 1 ? argv[1] : "/data/records.log";
    long interval_ms = argc > 2 ? atol(argv[2]) : 20;
    long print_every = argc > 3 ? atol(argv[3]) : 1;
    if (print_every < 1) print_every = 1;

    crc_init();
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    int fd = -1;
    while (fd < 0 && !stop) {
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) {
            say("KBERR open %s: %s\n", path, strerror(errno));
            sleep_ms(1000);
        }
    }
    if (fd < 0) return 1;

    uint64_t seq = resume_point(fd);
    say("KBSTART %llu\n", (unsigned long long)seq);

    unsigned char rec[REC_SIZE];
    while (!stop) {
        make_record(rec, seq);
        /* pwrite at the record's own offset: a retry after an error rewrites
         * the same slot instead of leaving a hole or a duplicate. */
        ssize_t w = pwrite(fd, rec, REC_SIZE, (off_t)(seq * REC_SIZE));
        if (w != REC_SIZE) {
            say("KBERR write seq %llu: %s\n", (unsigned long long)seq,
                w < 0 ? strerror(errno) : "short write");
            sleep_ms(1000);
            continue;
        }
        if (fsync(fd) != 0) {
            say("KBERR fsync seq %llu: %s\n", (unsigned long long)seq, strerror(errno));
            sleep_ms(1000);
            continue;
        }
        unsigned long long durable = mono_us();
        if (seq % (uint64_t)print_every == 0)
            say("KBSEQ %llu %llu\n", (unsigned long long)seq, durable);
        seq++;
        if (interval_ms > 0) sleep_ms(interval_ms);
    }
    say("KBSTOP %llu\n", (unsigned long long)seq);
    close(fd);
    return 0;
}
