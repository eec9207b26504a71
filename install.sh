#!/bin/sh
# Install usbpass on Debian 12 and start its daemon: system packages, a release build,
# the binaries, man page, completions, default rules file, systemd unit. Run as root
# from a checkout. Safe to run again: an existing rules file is never overwritten.
set -eu
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo ./install.sh)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Build: libvirt, libudev, libusb and pkg-config for the -sys crates, gcc for linking.
# Run: libvirt's daemon, QEMU driver and clients, QEMU itself, udev.
packages="ca-certificates curl gcc libc6-dev pkg-config libvirt-dev libudev-dev libusb-1.0-0-dev
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 udev kmod"
if [ -d /run/systemd/system ]; then
    # The systemd units for libvirtd/virtqemud, the libvirt-qemu user, polkit rules.
    packages="$packages libvirt-daemon-system"
fi
# shellcheck disable=SC2086
apt-get install -y -q $packages

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    else
        # Debian 12's own rustc is too old for the dependencies; rustup's stable is not.
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

cargo build --release --locked --bins
install -D -m 0755 target/release/usbpass /usr/bin/usbpass
install -D -m 0755 target/release/usbpassd /usr/bin/usbpassd
install -D -m 0755 target/release/usbpass-qemu /usr/bin/usbpass-qemu
install -d -m 0755 /usr/share/man/man1 /usr/share/bash-completion/completions \
    /usr/share/zsh/vendor-completions /usr/share/fish/vendor_completions.d
/usr/bin/usbpass man --dir /usr/share/man/man1
/usr/bin/usbpass completions bash > /usr/share/bash-completion/completions/usbpass
/usr/bin/usbpass completions zsh > /usr/share/zsh/vendor-completions/_usbpass
/usr/bin/usbpass completions fish > /usr/share/fish/vendor_completions.d/usbpass.fish

install -d -m 0755 /etc/usbpass
if [ ! -e /etc/usbpass/usbpass.toml ]; then
    /usr/bin/usbpass default-config > /etc/usbpass/usbpass.toml.new
    mv /etc/usbpass/usbpass.toml.new /etc/usbpass/usbpass.toml
fi
/usr/bin/usbpass check

install -D -m 0644 systemd/usbpass.service /etc/systemd/system/usbpass.service

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now libvirtd.service 2>/dev/null || systemctl enable --now virtqemud.socket
    systemctl enable usbpass.service
    systemctl restart usbpass.service
    systemctl --no-pager --lines=5 status usbpass.service
else
    # No systemd (a container or a CI machine): start libvirt's daemons and usbpass by
    # hand. The host's libvirt configuration is left as it is. libvirtd's QEMU driver
    # refuses to start without its user and group, which libvirt-daemon-system (not
    # installed here: it expects systemd) would have created.
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    install -d -m 0755 /var/log/libvirt /var/lib/libvirt/qemu /run/libvirt
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
    if [ -f /run/usbpass/daemon.pid ] && kill -0 "$(cat /run/usbpass/daemon.pid)" 2>/dev/null; then
        kill "$(cat /run/usbpass/daemon.pid)"
        sleep 1
    fi
    install -d -m 0755 /run/usbpass /var/log/usbpass
    nohup /usr/bin/usbpassd >>/var/log/usbpass/daemon.log 2>&1 &
    echo $! > /run/usbpass/daemon.pid
    # The daemon writes its state file after its first reconcile.
    i=0
    until /usr/bin/usbpass status >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 50 ]; then
            echo "install.sh: the daemon did not come up; its log:" >&2
            tail -n 20 /var/log/usbpass/daemon.log >&2
            exit 1
        fi
        sleep 0.2
    done
    /usr/bin/usbpass status
fi
