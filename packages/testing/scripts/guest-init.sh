#!/bin/busybox sh
# /init of Lifeboat's test machine (PID 1, busybox only, no initrd). Everything it does is
# selected on the kernel command line (lifeboat.*=...) so one image serves every test:
#   lifeboat.hostname=NAME        host name printed in the boot marker (default lifeboat-test)
#   lifeboat.mark=TEXT            write TEXT to /var/lifeboat/marker (fsynced) after boot
#   lifeboat.ip=A.B.C.D/N         static address on eth0 (default: a cloud-init seed disk's
#                                 address for eth0's MAC when one is attached, else DHCP)
#   lifeboat.gw=A.B.C.D           default gateway with lifeboat.ip
#   lifeboat.writer=1             write files continuously (see writer below)
#   lifeboat.writer-interval-ms=N pause between files (default 100)
#   lifeboat.writer-keep=N        files kept; older ones are deleted (default 100)
#   lifeboat.stamp-disk=DEV       block device the writer stamps each counter on (default: the
#                                 second NVMe disk when there is one, or none)
# Console lines (all start with LIFEBOAT-) are what tests wait for.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run

arg() {
  for w in $(cat /proc/cmdline); do
    case "$w" in "$1="*)
      echo "${w#*=}"
      return 0
      ;;
    esac
  done
  echo "$2"
}

hostname "$(arg lifeboat.hostname lifeboat-test)"
# The cloud kernel has NVMe and ext4 built in; virtio-net and virtio-console are modules.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover \
  net_failover virtio_net virtio_console virtio_blk cdrom isofs; do
  [ -e "/lib/modules/$m.ko" ] && { insmod "/lib/modules/$m.ko" 2>&1 | sed "s/^/LIFEBOAT-INSMOD $m: /"; }
done

mkdir -p /var/lifeboat/files
marker=$(cat /var/lifeboat/marker 2>/dev/null || echo none)
echo "LIFEBOAT-BOOT-OK $(hostname) $marker"
echo "LIFEBOAT-LAST-INDEX $(cat /var/lifeboat/index 2>/dev/null || echo none)"

# Replaces a small file atomically and durably: temp file, fsync, rename, fsync the directory.
put_durable() {
  echo "$2" >"$1.tmp"
  sync "$1.tmp"
  mv "$1.tmp" "$1"
  sync "$(dirname "$1")"
}

mark=$(arg lifeboat.mark "")
if [ -n "$mark" ]; then
  put_durable /var/lifeboat/marker "$mark"
  echo "LIFEBOAT-MARK-WRITTEN $mark"
fi

# A minimal stand-in for cloud-init, which this busybox image does not have: when a NoCloud
# seed disk (file system label cidata) is attached, apply its network-config (version 2) to
# the NIC of each MAC with busybox ip. It reads only what Lifeboat's recovery host writes
# (packages/recovery/src/seed-disk.ts: per NIC a MAC match, set-name, static addresses, a
# default route, name servers); real guests run cloud-init itself on the same document.
seeded=""
seed_network() {
  dev=$(findfs LABEL=cidata 2>/dev/null) || return 0
  mkdir -p /run/seed
  mount -t iso9660 -o ro,nojoliet "$dev" /run/seed 2>/dev/null || return 0
  # meta-data's local-hostname, as cloud-init sets it (the boot marker above keeps the old one).
  h=$(sed -n 's/^local-hostname: *//p' /run/seed/meta-data 2>/dev/null)
  [ -n "$h" ] && hostname "$h"
  if [ -f /run/seed/network-config ]; then
    echo "LIFEBOAT-SEED $dev $(hostname)"
    awk '
      function flush() { if (mac != "") print mac, name, addr, gw, dns }
      /^  [^ ].*:$/ { flush(); mac = ""; name = "-"; addr = "-"; gw = "-"; dns = "-"; next }
      /^      macaddress:/ { v = $2; gsub(/"/, "", v); mac = tolower(v) }
      /^    set-name:/ { name = $2 }
      /^    addresses:/ { v = $0; sub(/.*\[/, "", v); sub(/\].*/, "", v); gsub(/[" ]/, "", v); addr = v }
      /^        via:/ { gw = $2 }
      /^      addresses:/ { v = $0; sub(/.*\[/, "", v); sub(/\].*/, "", v); gsub(/[" ]/, "", v); dns = v }
      END { flush() }
    ' /run/seed/network-config >/run/seed-nics
    while read -r mac name addr gw dns; do
      nic=""
      for n in /sys/class/net/*; do
        [ "$(cat "$n/address" 2>/dev/null)" = "$mac" ] && nic=$(basename "$n")
      done
      if [ -z "$nic" ]; then
        echo "LIFEBOAT-SEED-NO-NIC $mac"
        continue
      fi
      if [ "$name" != "-" ] && [ "$name" != "$nic" ]; then
        ip link set dev "$nic" down
        ip link set dev "$nic" name "$name" && nic=$name
      fi
      ip link set dev "$nic" up
      for a in $(echo "$addr" | tr ',' ' '); do [ "$a" != "-" ] && ip addr add "$a" dev "$nic"; done
      [ "$gw" != "-" ] && ip route add default via "$gw" dev "$nic"
      if [ "$dns" != "-" ]; then
        for d in $(echo "$dns" | tr ',' ' '); do echo "nameserver $d" >>/etc/resolv.conf; done
      fi
      seeded="$seeded $nic"
      echo "LIFEBOAT-NET-SEED $nic $mac $(ip -4 -o addr show dev "$nic" | awk '{print $4}' | tr '\n' ' ')"
    done </run/seed-nics
  fi
  umount /run/seed
}
seed_network

if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  ip=$(arg lifeboat.ip "")
  case " $seeded " in *" eth0 "*) ip=seeded ;; esac
  if [ "$ip" = seeded ]; then
    :
  elif [ -n "$ip" ]; then
    ip addr add "$ip" dev eth0
    gw=$(arg lifeboat.gw "")
    [ -n "$gw" ] && ip route add default via "$gw"
  else
    udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 1 >/dev/null 2>&1
  fi
  echo "LIFEBOAT-NET $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
fi

# A tiny TCP service so a test can check that a port of the guest answers.
printf '#!/bin/sh\necho "LIFEBOAT-TCP-OK %s"\n' "$(hostname)" >/run/banner.sh
chmod 755 /run/banner.sh
nc -ll -p 22 -e /run/banner.sh >/dev/null 2>&1 &
mkdir -p /run/www
echo "LIFEBOAT-HTTP-OK $(hostname) $marker" >/run/www/index.html
httpd -p 80 -h /run/www

# QEMU guest agent on its virtio-serial port, for app-consistent points (fsfreeze).
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] || continue
  if [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ]; then
    qemu-ga -m virtio-serial -p "/dev/$(basename "$p")" -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log -d &&
      echo "LIFEBOAT-QGA-STARTED"
  fi
done

writer() {
  interval=$(arg lifeboat.writer-interval-ms 100)
  keep=$(arg lifeboat.writer-keep 100)
  stamp=$(arg lifeboat.stamp-disk "")
  [ -z "$stamp" ] && [ -b /dev/nvme1n1 ] && stamp=/dev/nvme1n1
  n=$(cat /var/lifeboat/index 2>/dev/null || echo 0)
  while true; do
    n=$((n + 1))
    f=/var/lifeboat/files/$n.dat
    # 16 KiB of a line naming the counter, so a restored file can be checked by content.
    yes "LIFEBOAT-FILE $n" | head -c 16384 >"$f"
    sync "$f"
    sync /var/lifeboat/files
    # The index names the newest finished file; it is written only after that file is durable.
    put_durable /var/lifeboat/index "$n"
    if [ -n "$stamp" ]; then
      printf 'LIFEBOAT-STAMP %012d\n' "$n" | dd of="$stamp" bs=512 count=1 conv=sync,fsync 2>/dev/null
    fi
    rm -f "/var/lifeboat/files/$((n - keep)).dat"
    echo "LIFEBOAT-WROTE $n"
    [ "$interval" -gt 0 ] && usleep $((interval * 1000))
  done
}

if [ "$(arg lifeboat.writer 0)" = 1 ]; then
  writer </dev/null >/dev/console 2>&1 &
fi
# The screen (VGA, what the recovery host's screendump shows): the machine as a user checks it at
# a glance, instead of the firmware's last words. The serial console above is for the tests.
if [ -c /dev/tty1 ]; then
  {
    printf '\033[2J\033[H'
    echo "Lifeboat test machine $(hostname) ($(uname -r))"
    echo
    row() { printf '  %-16s %s\n' "$1" "$2"; }
    row booted "$(date -u '+%Y-%m-%d %H:%M:%S') UTC"
    row "marker at boot" "$marker"
    [ -n "$mark" ] && row "marker written" "$mark"
    row "last file" "$(cat /var/lifeboat/index 2>/dev/null || echo none)"
    for n in /sys/class/net/*; do
      nic=$(basename "$n")
      [ "$nic" = lo ] && continue
      row "$nic" "$(ip -4 -o addr show dev "$nic" | awk '{print $4}' | tr '\n' ' ')"
    done
    row services "tcp 22 (banner), http 80"
    echo
    echo "$(hostname) is ready."
  } >/dev/tty1 2>/dev/null
fi
echo "LIFEBOAT-READY $(hostname)"

# PID 1 must never exit; it also reaps orphans.
while true; do
  sleep 3600
done
