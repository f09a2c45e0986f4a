#!/bin/sh
# Install the built Alloy app for the current user (no root), or remove it again.
#
#   sh packaging/install-linux.sh install [APP_FOLDER]    (default APP_FOLDER: dist/alloy)
#   sh packaging/install-linux.sh uninstall
#
# install copies APP_FOLDER to ~/.local/opt/alloy, links ~/.local/bin/alloy-app to its executable,
# and registers with the desktop: the launcher entry (alloy.desktop), the icon in the hicolor theme,
# the application/x-safetensors MIME type (*.safetensors) and Alloy as its default application, so a
# double-click on a .safetensors file opens it in Alloy. The desktop databases are refreshed with
# update-mime-database, update-desktop-database, gtk-update-icon-cache and xdg-mime where installed;
# without them the files are in place and take effect at the next login.
# Honours XDG_DATA_HOME; PREFIX (default ~/.local) moves everything else.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
RESOURCES="$ROOT/resources"
PREFIX=${PREFIX:-"$HOME/.local"}
DATA=${XDG_DATA_HOME:-"$PREFIX/share"}
APP_DIR="$PREFIX/opt/alloy"
BIN_LINK="$PREFIX/bin/alloy-app"
DESKTOP_FILE="$DATA/applications/alloy.desktop"
MIME_FILE="$DATA/mime/packages/alloy-safetensors.xml"
ICONS="$DATA/icons/hicolor"
MIME_TYPE="application/x-safetensors"
SIZES="16 24 32 48 64 128 256 512"

have() { command -v "$1" >/dev/null 2>&1; }
say() { printf '%s\n' "$*"; }

refresh_databases() {
    if have update-mime-database; then update-mime-database "$DATA/mime" >/dev/null 2>&1 || say "warning: update-mime-database failed"; fi
    if have update-desktop-database; then update-desktop-database "$DATA/applications" >/dev/null 2>&1 || true; fi
    if have gtk-update-icon-cache && [ -f "$ICONS/index.theme" ]; then gtk-update-icon-cache -q -t "$ICONS" >/dev/null 2>&1 || true; fi
}

# Make Alloy the default for .safetensors: xdg-mime when present, else the user's mimeapps.list directly.
set_default_app() {
    if have xdg-mime; then
        xdg-mime default alloy.desktop "$MIME_TYPE" && return 0
    fi
    config=${XDG_CONFIG_HOME:-"$HOME/.config"}
    list="$config/mimeapps.list"
    mkdir -p "$config"
    [ -f "$list" ] || : >"$list"
    tmp="$list.alloy-tmp"
    awk -v entry="$MIME_TYPE=alloy.desktop;" -v key="$MIME_TYPE=" '
        /^\[/ { if (in_defaults && !done) { print entry; done = 1 } in_defaults = ($0 == "[Default Applications]") }
        in_defaults && index($0, key) == 1 { if (!done) { print entry; done = 1 } next }
        { print }
        END {
            if (!done) { if (!in_defaults) print "[Default Applications]"; print entry }
        }' "$list" >"$tmp"
    mv "$tmp" "$list"
}

unset_default_app() {
    list="${XDG_CONFIG_HOME:-"$HOME/.config"}/mimeapps.list"
    [ -f "$list" ] || return 0
    grep -v "^$MIME_TYPE=alloy.desktop;\?$" "$list" >"$list.alloy-tmp" || true
    mv "$list.alloy-tmp" "$list"
}

install_app() {
    src=${1:-"$ROOT/dist/alloy"}
    if [ ! -x "$src/alloy" ]; then
        say "error: $src/alloy not found; build it first with 'make package'" >&2
        exit 1
    fi
    src=$(cd "$src" && pwd)
    # Copy next to the old install and swap, so a failed copy never leaves half an app.
    mkdir -p "$PREFIX/opt"
    rm -rf "$APP_DIR.new"
    cp -a "$src" "$APP_DIR.new"
    rm -rf "$APP_DIR"
    mv "$APP_DIR.new" "$APP_DIR"
    mkdir -p "$PREFIX/bin"
    ln -sfn "$APP_DIR/alloy" "$BIN_LINK"

    mkdir -p "$ICONS/scalable/apps"
    cp "$RESOURCES/icons/alloy.svg" "$ICONS/scalable/apps/alloy.svg"
    for size in $SIZES; do
        mkdir -p "$ICONS/${size}x${size}/apps"
        cp "$RESOURCES/icons/png/alloy-$size.png" "$ICONS/${size}x${size}/apps/alloy.png"
    done

    mkdir -p "$DATA/mime/packages"
    cp "$RESOURCES/mime/alloy-safetensors.xml" "$MIME_FILE"

    # Exec and TryExec name the installed executable by absolute path: no reliance on PATH.
    mkdir -p "$DATA/applications"
    sed -e "s|^Exec=alloy |Exec=\"$APP_DIR/alloy\" |" -e "s|^TryExec=alloy\$|TryExec=$APP_DIR/alloy|" \
        "$RESOURCES/alloy.desktop" >"$DESKTOP_FILE"
    chmod 644 "$DESKTOP_FILE"

    refresh_databases
    set_default_app
    say "Installed Alloy to $APP_DIR"
    say "  launcher:  $DESKTOP_FILE (menu: Alloy)"
    say "  command:   $BIN_LINK"
    say "  .safetensors files open in Alloy ($MIME_TYPE)."
}

uninstall_app() {
    rm -rf "$APP_DIR" "$APP_DIR.new"
    if [ -L "$BIN_LINK" ]; then rm -f "$BIN_LINK"; fi
    rm -f "$DESKTOP_FILE" "$MIME_FILE" "$ICONS/scalable/apps/alloy.svg"
    for size in $SIZES; do rm -f "$ICONS/${size}x${size}/apps/alloy.png"; done
    unset_default_app
    refresh_databases
    say "Removed Alloy from $PREFIX (settings and caches in ~/.config/Alloy and ~/.cache/alloy are kept)."
}

case "${1:-}" in
    install) install_app "${2:-}" ;;
    uninstall) uninstall_app ;;
    *) say "usage: sh $0 install [APP_FOLDER] | uninstall" >&2; exit 2 ;;
esac
