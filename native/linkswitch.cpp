#include "linkswitch.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__linux__)
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#endif

namespace edgemoe {

namespace {

constexpr uint32_t kTimerTag = 0xFFFFFFF0u, kWakeTag = 0xFFFFFFF1u, kWatchTag = 0xFFFFFFF2u;
constexpr size_t kMaxPacket = 65536 + 64;

int64_t to_ns(double s) { return int64_t(std::llround(s * 1e9)); }

int64_t wire_ns(size_t bytes, double bits_per_s) {
  return bits_per_s > 0 ? int64_t(std::llround(8.0 * double(bytes) / bits_per_s * 1e9)) : 0;
}

#if defined(__linux__)
int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

[[noreturn]] void fail(const char* what) {
  throw std::runtime_error(std::string("link switch: ") + what + ": " + std::strerror(errno));
}
#endif

}  // namespace

#if defined(__linux__)

LinkSwitch::LinkSwitch(std::vector<LinkPort> ports, double spin_s) : spin_ns_(to_ns(spin_s)) {
  if (ports.empty()) throw std::invalid_argument("link switch: no ports");
  if (!(spin_s >= 0 && spin_s < 0.01)) throw std::invalid_argument("link switch: spin must be in [0, 10 ms)");
  for (const LinkPort& p : ports) {
    if (p.fd < 0) throw std::invalid_argument("link switch: a port has no descriptor");
    if (!(p.delay_s >= 0 && p.delay_s < 10) || !(p.bits_per_s >= 0))
      throw std::invalid_argument("link switch: a port's delay must be in [0, 10 s) and its rate >= 0");
    for (const PortState& q : ports_)
      if (q.link.address == p.address) throw std::invalid_argument("link switch: two ports have one address");
    ports_.push_back(PortState{p, 0, 0});
  }
  epoll_ = epoll_create1(EPOLL_CLOEXEC);
  timer_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_ < 0 || timer_ < 0 || wake_ < 0) {
    int e = errno;
    for (int fd : {epoll_, timer_, wake_})
      if (fd >= 0) close(fd);
    errno = e;
    fail("epoll, timerfd or eventfd");
  }
  auto add = [&](int fd, uint32_t tag) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = tag;
    if (epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &ev) != 0) fail("epoll_ctl");
  };
  for (uint32_t i = 0; i < ports_.size(); ++i) add(ports_[i].link.fd, i);
  add(timer_, kTimerTag);
  add(wake_, kWakeTag);
}

LinkSwitch::~LinkSwitch() {
  for (int fd : {epoll_, timer_, wake_})
    if (fd >= 0) close(fd);
}

void LinkSwitch::stop() {
  uint64_t one = 1;
  ssize_t n = write(wake_, &one, sizeof one);
  (void)n;  // the counter saturating still leaves it readable
}

void LinkSwitch::read_port(uint32_t i, std::vector<uint8_t>& buf) {
  PortState& src = ports_[i];
  for (;;) {
    ssize_t n = read(src.link.fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EAGAIN: drained (or an endpoint going away: nothing more to read)
    }
    if (n == 0) return;
    const int64_t t = now_ns();
    const size_t len = size_t(n);
    const uint8_t* p = buf.data();
    if (len < 20 || (p[0] >> 4) != 4) {
      ++totals_.dropped;
      continue;
    }
    const uint32_t daddr = uint32_t(p[16]) << 24 | uint32_t(p[17]) << 16 | uint32_t(p[18]) << 8 | p[19];
    uint32_t d = 0;
    while (d < ports_.size() && ports_[d].link.address != daddr) ++d;
    if (d == ports_.size()) {
      ++totals_.dropped;
      continue;
    }
    PortState& dst = ports_[d];
    const int64_t up_wire = wire_ns(len, src.link.bits_per_s), down_wire = wire_ns(len, dst.link.bits_per_s);
    const int64_t src_delay = to_ns(src.link.delay_s), dst_delay = to_ns(dst.link.delay_s);
    src.up_free_ns = std::max(t, src.up_free_ns) + up_wire;
    dst.down_free_ns = std::max(src.up_free_ns + src_delay, dst.down_free_ns) + down_wire;
    const int64_t due = dst.down_free_ns + dst_delay;

    const uint8_t protocol = p[9];
    const size_t ihl = size_t(p[0] & 0x0F) * 4;
    const bool first_fragment = ((uint32_t(p[6]) << 8 | p[7]) & 0x1FFF) == 0;
    uint16_t sport = 0, dport = 0;
    if ((protocol == 6 || protocol == 17) && first_fragment && ihl >= 20 && len >= ihl + 4) {
      sport = uint16_t(p[ihl] << 8 | p[ihl + 1]);
      dport = uint16_t(p[ihl + 2] << 8 | p[ihl + 3]);
    }
    LinkFlow& f = flows_[FlowKey{i, d, protocol, sport, dport}];
    if (f.packets == 0) f = LinkFlow{i, d, protocol, sport, dport, 0, 0, 0};
    ++f.packets;
    f.bytes += len;
    f.queued_s += double(due - t - src_delay - dst_delay - up_wire - down_wire) * 1e-9;
    ++totals_.packets;
    totals_.bytes += len;
    held_.push(Held{due, seq_++, d, std::vector<uint8_t>(p, p + len)});
  }
}

void LinkSwitch::deliver_due(int64_t now) {
  while (!held_.empty() && held_.top().due_ns <= now) {
    const Held& h = held_.top();
    const int64_t before = now_ns();
    ssize_t n;
    do {
      n = write(ports_[h.dst].link.fd, h.packet.data(), h.packet.size());
    } while (n < 0 && errno == EINTR);
    if (n < 0) ++totals_.dropped;  // an endpoint whose namespace is going away: its packets are lost
    totals_.write_sum_s += double(now_ns() - before) * 1e-9;
    const double late = double(before - h.due_ns) * 1e-9;
    totals_.late_sum_s += late;
    totals_.late_max_s = std::max(totals_.late_max_s, late);
    totals_.late_over_50us += late > 50e-6;
    totals_.late_over_200us += late > 200e-6;
    totals_.late_over_1ms += late > 1e-3;
    held_.pop();
  }
}

LinkSwitch::Stop LinkSwitch::run(int watch_fd) {
  // Sleeps end when asked, not up to 50 us later (the default slack of a normal thread).
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  if (watch_fd >= 0) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = kWatchTag;
    if (epoll_ctl(epoll_, EPOLL_CTL_ADD, watch_fd, &ev) != 0) fail("epoll_ctl (the watched descriptor)");
  }
  struct Unwatch {  // however run() ends, the next one can watch the descriptor again
    int epoll, fd;
    ~Unwatch() {
      if (fd >= 0) epoll_ctl(epoll, EPOLL_CTL_DEL, fd, nullptr);
    }
  } unwatch{epoll_, watch_fd};
  const int64_t started = now_ns();
  std::vector<uint8_t> buf(kMaxPacket);
  epoll_event events[64];
  int64_t armed = -1;  // the timer's absolute expiry, -1: disarmed
  Stop why = kStopped;
  for (bool going = true; going;) {
    int64_t now = now_ns();
    deliver_due(now);
    int timeout = -1;
    int64_t wake_at = -1;
    if (!held_.empty()) {
      wake_at = held_.top().due_ns - spin_ns_;
      now = now_ns();
      if (wake_at <= now) {
        timeout = 0;  // due within the spin: poll
        wake_at = -1;
      }
    }
    if (wake_at != armed) {
      itimerspec its{};
      if (wake_at >= 0) {
        its.it_value.tv_sec = time_t(wake_at / 1000000000);
        its.it_value.tv_nsec = long(wake_at % 1000000000);
      }
      if (timerfd_settime(timer_, TFD_TIMER_ABSTIME, &its, nullptr) != 0) fail("timerfd_settime");
      armed = wake_at;
    }
    int n = epoll_wait(epoll_, events, 64, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("epoll_wait");
    }
    if (n > 0) ++totals_.wakeups;
    for (int k = 0; k < n; ++k) {
      const uint32_t tag = events[k].data.u32;
      if (tag < ports_.size()) {
        read_port(tag, buf);
      } else if (tag == kTimerTag) {
        uint64_t expirations;
        ssize_t r = read(timer_, &expirations, sizeof expirations);
        (void)r;
        armed = -1;
      } else if (tag == kWakeTag) {
        uint64_t v;
        ssize_t r = read(wake_, &v, sizeof v);
        (void)r;
        why = kStopped;
        going = false;
      } else if (tag == kWatchTag) {
        why = kReadable;
        going = false;
      }
    }
  }
  totals_.seconds += double(now_ns() - started) * 1e-9;
  return why;
}

LinkStats LinkSwitch::stats() const {
  LinkStats s = totals_;
  s.flows.reserve(flows_.size());
  for (const auto& kv : flows_) s.flows.push_back(kv.second);
  return s;
}

#else  // not Linux: the emulator needs TUN devices, epoll and timerfd

LinkSwitch::LinkSwitch(std::vector<LinkPort>, double) : spin_ns_(0) {
  throw std::runtime_error("link switch: the link emulator runs on Linux only");
}
LinkSwitch::~LinkSwitch() = default;
void LinkSwitch::stop() {}
LinkSwitch::Stop LinkSwitch::run(int) { return kStopped; }
LinkStats LinkSwitch::stats() const { return totals_; }

#endif

}  // namespace edgemoe
